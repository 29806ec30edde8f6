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
    display, path = srv.manager.resolve(name)  # 404 for unknown names
    if store is not None:
        try:
            info = store.show_model(display)
        except FileNotFoundError:  # served from a path outside the store
            info = store.show_model(str(path))
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
            "capabilities": ["completion"], "modified_at": iso(info.get("modified") or time.time())}


def pull(name: str, progress: Callable[[str, int, int | None], None]) -> None:
    store = _store()
    if store is None:
        from ..errors import HearthError

        raise HearthError("this build has no model store (hearthlm.store): pass a model path to `hearth serve`")
    store.pull(name, progress)


def remove(name: str) -> None:
    store = _store()
    if store is None:
        from ..errors import InvalidRequestError

        raise InvalidRequestError("this build has no model store (hearthlm.store): nothing to delete")
    store.remove(name)
