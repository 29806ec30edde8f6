"""Tiny model files for store tests: a few-KB GGUF and an HF directory (no real weights needed)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


def make_tiny_gguf(path: Path, name: str = "tiny") -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_string("general.license", "mit")
    w.add_token_list([f"t{i}" for i in range(100)])  # longer than 64: stored as a length
    w.add_chat_template(TEMPLATE)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((100, 8), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_tiny_hf_dir(path: Path) -> Path:
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=100, hidden_size=8,
               intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
               max_position_embeddings=512, torch_dtype="bfloat16", tie_word_embeddings=True)
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    (path / "notes.txt").write_text("not part of a model")
    save_file({"model.embed_tokens.weight": np.zeros((100, 8), dtype=np.float32)}, str(path / "model.safetensors"))
    return path


class GGUFSite:
    """A local HTTP server: /m/<file> serves a GGUF, /bytes serves non-GGUF bytes, /redirect?to=URL redirects,
    /download serves the GGUF with a Content-Disposition name."""

    def __init__(self, data: bytes, disposition: str = 'attachment; filename="../../evil.gguf"'):
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                site.paths.append(self.path)
                if self.path.startswith("/redirect?to="):
                    self.send_response(302)
                    self.send_header("Location", self.path.split("=", 1)[1])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = b"#!/bin/sh\necho pwned\n" if self.path.startswith("/bytes") else data
                self.send_response(200)
                if self.path.startswith("/download"):
                    self.send_header("Content-Disposition", disposition)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.paths: list[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def make_victim(root: Path) -> Path:
    """A directory of user data outside the store (a file, a GGUF, an HF dir) that traversal tests must not touch."""
    d = root / "victim"
    d.mkdir()
    (d / "precious.txt").write_text("keep me")
    make_tiny_gguf(d / "victim.gguf")
    make_tiny_hf_dir(d / "hf")
    return d
