"""The fake's own control endpoints (/_fake/*, never faulted) and Gin's 404 for unknown paths."""

from __future__ import annotations

import contextlib
import json
import os

from aiohttp import web

from .plumbing import Record
from .scheduler import Residency


class ControlAPI(Residency):
    """Request log, fault set and stats for tests."""

    # ---- control ----------------------------------------------------------------------

    async def _fake_requests(self, request: web.Request) -> web.StreamResponse:
        path = request.query.get("path")
        state = request.query.get("state")
        out = [
            r.as_json()
            for r in self.log
            if (path is None or r.path == path) and (state is None or r.state == state)
        ]
        return self._json(out)

    async def _fake_clear(self, request: web.Request) -> web.StreamResponse:
        n = len(self.log)
        self.log.clear()
        return self._json({"cleared": n})

    async def _fake_faults_get(self, request: web.Request) -> web.StreamResponse:
        return self._json(self.faults_raw)

    async def _fake_faults_set(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            data = json.loads(raw) if raw.strip() else {}
            self.set_faults(data)
        except (ValueError, TypeError) as exc:
            return self._json({"error": str(exc)}, 400)
        return self._json(self.faults_raw)

    async def _fake_stats(self, request: web.Request) -> web.StreamResponse:
        running = sum(1 for r in self.log if r.state == "running")
        return self._json(
            {
                "name": self.name,
                "pid": os.getpid(),
                "counts": self.counts,
                "running": running,
                "logged": len(self.log),
                "loaded": sorted(ld.info.key for ld in self.resident()),
                "waiting": self.sched.waiting,
                "active": {k: n for k, n in self.sched.active.items() if n},
                "max_loaded": self.sched.max_loaded,
                "resident": [
                    {
                        "model": ld.info.name,
                        "size": ld.size,
                        "size_vram": ld.size_vram,
                        "context_length": ld.context_length,
                        "expires": ld.expires,
                        "busy": self.sched.busy(ld.info.key),
                    }
                    for ld in self.resident()
                ],
                **self.tally.as_json(),
            }
        )

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        """Gin's own 404 for a path Ollama does not serve, logged so pass-through shows."""
        rec = Record(self._next_id, request)
        self._next_id += 1
        self.log.append(rec)
        raw = await request.read()
        if request.content_type == "application/json" and raw.strip():
            with contextlib.suppress(ValueError):
                rec.body = json.loads(raw)
        elif raw:
            rec.body = {"bytes": len(raw), "content_type": request.content_type}
        if isinstance(rec.body, dict) and isinstance(rec.body.get("model"), str):
            rec.model = rec.body["model"]
        rec.finish("failed", 404)
        rec.finished_seq = self.sched.tick()
        return web.Response(status=404, text="404 page not found", content_type="text/plain")
