"""A fixed English text (~1,500 tokens) for perplexity tests; varied prose, no repetition."""

PARAGRAPHS = [
    "The lighthouse at the end of the harbour had been dark for eleven years when the new keeper arrived. She "
    "came on the morning ferry with two suitcases, a box of books and a cat that refused to leave its basket. "
    "The fishermen watched her climb the hill road and agreed among themselves that she would not last the "
    "winter. By the first storm in October the lamp was turning again, and nobody mentioned the bet.",
    "Bread is one of the oldest prepared foods. Archaeologists have found charred crumbs in a hearth in Jordan "
    "that are more than fourteen thousand years old, which is earlier than the first farming villages. The "
    "earliest loaves were flat and dense; leavened bread came later, when bakers learned to keep a portion of "
    "fermenting dough from one batch to start the next. Today a baker can buy dried yeast in a packet, but many "
    "still prefer a sourdough starter that has been fed flour and water every day for decades.",
    "When you plan a long walk in the mountains, start by checking the weather forecast for the whole day, not "
    "only the morning. Carry more water than you think you will need, a warm layer even in summer, and a map "
    "that does not depend on a battery. Tell someone where you are going and when you expect to return. Turn "
    "back if the clouds come down or the path becomes unclear; the summit will still be there next week.",
    "The committee met on Tuesday to discuss the budget for the coming year. Members agreed that the library "
    "roof must be repaired before the rainy season, and that the cost should be shared between the town and "
    "the county. A proposal to extend the opening hours of the swimming pool was postponed until more figures "
    "are available. The chair thanked the volunteers who had organised the spring market, which raised enough "
    "money to buy new chairs for the community hall.",
    "Rivers shape the land in two ways: they carry material away and they put it down somewhere else. In the "
    "steep upper reaches, fast water cuts narrow valleys and rolls boulders along the bed. Lower down, where "
    "the slope is gentle, the river slows, drops its sand and silt, and begins to wander in wide loops called "
    "meanders. Over thousands of years a meander can be cut off during a flood, leaving behind a curved lake "
    "that slowly fills with reeds and becomes a marsh.",
    "My grandfather kept a notebook in the pocket of his coat for as long as I can remember. He wrote down the "
    "date of the first frost, the day the swallows returned, the price of potatoes at the market and the names "
    "of people he met on the train. When he died we found forty of those notebooks in a drawer, tied together "
    "with string, and reading them was like walking beside him again through half a century of ordinary days.",
    "A computer program is a list of instructions, but writing a good one is closer to writing an essay than "
    "to filling in a form. The author has to decide what the reader needs to know first, which details can "
    "wait, and which names will make the ideas clear. Code that works but cannot be understood is a debt that "
    "someone will have to pay later, usually at the worst possible moment, late at night, with a customer on "
    "the telephone asking why the invoices have stopped arriving.",
    "The orchestra tuned for a long minute while the hall slowly went quiet. Then the conductor raised her "
    "hands, and the first notes of the symphony rose from the cellos, low and uncertain, as if the music were "
    "deciding whether to begin at all. By the end of the first movement half the audience had forgotten their "
    "coats, their tickets and the rain outside; they were simply listening, which is rarer than it sounds.",
    "Honey bees communicate the location of food with a dance. A forager returning to the hive walks in a "
    "figure of eight on the vertical face of the comb, waggling her body during the straight part of the run. "
    "The angle of that run relative to the vertical tells the other bees the direction of the flowers relative "
    "to the sun, and the length of the waggle tells them how far away the flowers are. The other workers follow "
    "her closely, then leave the hive and fly straight to the source.",
    "The train was forty minutes late, and the station café had run out of everything except tea and a plate "
    "of biscuits that nobody trusted. A student read a thick textbook on economics, a man in a grey suit made "
    "three phone calls about a contract, and a small boy explained to his mother, patiently and at length, why "
    "dinosaurs would have been better at football than people. When the train finally arrived, everybody "
    "stood up at once, as if the waiting had been a performance and the curtain had just come down.",
]

TEXT = "\n\n".join(PARAGRAPHS) + "\n"
