"""The model store (hearthlm.store) seen through Ollama's /api/tags, /api/show, /api/pull, /api/delete shapes."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .common import Server

log = logging.getLogger("hearthlm.serve")


def _store():
    try:
        from .. import store

        return store if hasattr(store, "list_models") else None
    except ImportError:
        return None


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


def details(info: dict[str, Any]) -> dict[str, Any]:
    arch = info.get("architecture") or "unknown"
    return {"parent_model": "", "format": info.get("format"), "family": arch, "families": [arch],
            "parameter_size": info.get("parameter_size"), "quantization_level": info.get("quantization")}


def _loaded_info(srv: Server) -> list[dict[str, Any]]:
    m = srv.manager.current
    if m is None:
        return [{"name": srv.cfg.model_name, "size_bytes": 0, "modified": srv.started_at}]
    cfg = m.engine.model_config
    return [{"name": m.name, "size_bytes": m.size_bytes, "modified": m.loaded_at, "architecture": cfg.architecture,
             "format": "gguf" if m.path.is_file() else "safetensors", "quantization": m.engine.loaded.quantization,
             "parameters": cfg.num_params, "path": str(m.path)}]


def model_infos(srv: Server) -> list[dict[str, Any]]:
    store = _store()
    try:
        infos = [i.to_dict() for i in store.list_models()] if store else []
    except Exception as e:  # noqa: BLE001 - a broken store must not hide the served model
        log.warning("model store listing failed (%s: %s); listing the served model only", type(e).__name__, e)
        store, infos = None, []
    names = {i["name"] for i in infos}
    served = srv.cfg.model_name
    if served not in names:  # served from a path, or no store module
        infos = [i for i in _loaded_info(srv) if i["name"] == served or not store] + infos
    return infos


def list_model_names(srv: Server) -> list[str]:
    names = [i["name"] for i in model_infos(srv)]
    served = srv.cfg.model_name
    return [served] + [n for n in names if n != served]


def tags(srv: Server) -> dict[str, Any]:
    return {"models": [{"name": i["name"], "model": i["name"], "modified_at": iso(i.get("modified") or time.time()),
                        "size": i.get("size_bytes", 0), "digest": i.get("digest") or "", "details": details(i)}
                       for i in model_infos(srv)]}


def show(srv: Server, name: str) -> dict[str, Any]:
    store = _store()
    display, path = srv.manager.resolve(name)  # the server's policy: 400 for paths and bad names, 404 unknown
    if store is not None:
        # resolve() let it through: a store name or alias, the served model (a CLI path), or an allowed local path
        local_ok = srv.cfg.allow_local_paths or display == srv.cfg.model_name
        from ..store.catalog import _is_default, find_dir

        # the served model given as a path on the command line, under a --served-model-name: shown by its path
        by_name = store.is_store_name(display) and (_is_default(display) or find_dir(display) is not None
                                                    or display != srv.cfg.model_name)
        ref = display if by_name else str(path)
        info = store.show_model(ref, allow_local_paths=local_ok)
    else:
        info = next((i for i in _loaded_info(srv)), {})
    arch = info.get("architecture") or "unknown"
    model_info = {"general.architecture": arch, "general.parameter_count": info.get("parameters"),
                  "general.file_type": info.get("quantization"),
                  f"{arch}.context_length": info.get("context_length"),
                  f"{arch}.embedding_length": info.get("embedding_length"),
                  f"{arch}.block_count": info.get("num_layers")}
    return {"modelfile": f"FROM {info.get('path', path)}\n", "parameters": "",
            "template": info.get("chat_template") or "",
            "license": info.get("license") or "", "details": details(info), "model_info": model_info,
            "capabilities": capabilities(path), "modified_at": iso(info.get("modified") or time.time())}


def capabilities(path) -> list[str]:
    """Ollama's capability names: an encoder only embeds; a decoder completes and calls tools (serve/tools.py
    renders them, through its template or a system message) and embeds too when it names a pooling."""
    from ..embed import is_encoder_dir, pooling_spec

    try:
        if is_encoder_dir(path):
            return ["embedding"]
        return ["completion", "tools"] + (["embedding"] if pooling_spec(path) is not None else [])
    except Exception:  # noqa: BLE001 - an unreadable model still has a /api/show answer
        return ["completion"]


def pull_policy(srv: Server | None):
    """The server's pull policy (hearthlm.store.PullPolicy); without a server, the strictest one."""
    from ..store import PullPolicy

    if srv is None:
        return PullPolicy()
    return PullPolicy(allow_local_paths=srv.cfg.allow_local_paths, allow_hosts=tuple(srv.cfg.allow_pull_hosts))


def pull(name: str, progress: Callable[[str, int, int | None], None], srv: Server | None = None) -> None:
    """/api/pull: under the server's policy (local paths only with --allow-local-paths; no file://; URL hosts: the
    HF hub and --allow-pull-host entries; no private addresses). srv None: the strictest policy."""
    store = _store()
    if store is None:
        from ..errors import HearthError

        raise HearthError("this build has no model store (hearthlm.store): pass a model path to `hearth serve`")
    store.pull(name, progress, policy=pull_policy(srv))


def remove(name: str) -> None:
    """/api/delete: store names only (400 for paths and invalid names); the store never deletes outside itself."""
    store = _store()
    if store is None:
        from ..errors import InvalidRequestError

        raise InvalidRequestError("this build has no model store (hearthlm.store): nothing to delete")
    store.remove(name)
