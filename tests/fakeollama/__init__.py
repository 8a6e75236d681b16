"""A fake Ollama server for harbord's tests and benchmarks.

Speaks Ollama's native API (``/api/*``), its OpenAI-compatible API (``/v1/chat/completions``,
``/v1/completions``, ``/v1/embeddings``, ``/v1/models[/{model}]``, ``/v1/responses``) and its
Anthropic-compatible API (``/v1/messages``, ``/v1/messages/count_tokens``) with the shapes,
statuses, SSE event names and error texts of a real server, and answers
deterministically: N tokens (``options.num_predict``/``max_tokens`` if given, with
done_reason "length", else ``--tokens``, default 8; Anthropic's ``max_tokens`` and the
Responses ``max_output_tokens`` only cap it), the first of which names the server
(``"[gpu] "``, ``"tok1 "``, ``"tok2 "`` ...). Every response carries
``X-Fake-Backend: NAME``. A path Ollama does not serve answers Gin's ``404 page not
found`` and is logged. Ollama's Anthropic stream sends no ``ping`` event, so neither
does this.

Memory and placement, as Ollama's scheduler behaves: a loaded model takes its weights
(``--model NAME=SIZE``) plus an f16 KV cache of ``2 * block_count * num_ctx *
embedding_length / head_count * head_count_kv * 2`` bytes, from the model's
``model_info`` (``/api/show``; ``--model-info`` sets it, else typical numbers for its
parameter count). ``num_ctx`` is ``options.num_ctx``, else ``--context-length``; a
different context reloads the model. ``/api/ps`` shows ``size``, ``size_vram`` and
``context_length``: a server named ``cpu`` or started with ``--cpu`` reports
``size_vram: 0``; with ``--vram`` a load past that memory spills (``size_vram < size``).
At most ``--max-loaded-models N`` (``--max-loaded``; default 3 as Ollama per GPU, 0 for no
limit) models are loaded, within the memory budget (``--vram`` on a GPU server, ``--ram``
on a CPU one): a load that does not fit evicts idle models, least recently used first,
and waits for busy ones to finish; a CPU load bigger than ``--ram`` alone fails with
Ollama's out-of-memory error. Loading takes ``--load-time [MODEL=]S`` (repeatable, per
model), once for concurrent requests; ``load_duration`` shows it when the request loaded
(or waited for) the model, near zero when it was loaded already. Embeddings load their
model too and then take ``--embed-time [MODEL=]S``. A model is gone from ``/api/ps``
``keep_alive`` after its last request ends. ``--parallel N`` requests run per
model at once, the rest wait inside the server (their order is in the request log's
``admitted_seq``/``finished_seq``), and past ``--max-queue`` waiting requests a 503
"server busy". ``--prompt-delay`` and ``--tokens-per-second`` time each generation.
An empty prompt/messages with ``keep_alive: 0`` unloads (done_reason "unload"); with any
other keep_alive it loads (done_reason "load").

    python3 -m tests.fakeollama --port 11434 [--host 127.0.0.1] [--name gpu]
        [--version 0.14.3] [--model NAME[=SIZE_BYTES]]... [--vram BYTES] [--cpu]
        [--model-info NAME=BLOCKS,EMBED,HEADS,KV_HEADS[,CTX]]... [--context-length N]
        [--parallel N] [--max-queue N] [--max-loaded-models N] [--ram BYTES]
        [--load-time [MODEL=]S]... [--prompt-delay [MODEL=]S]... [--embed-time [MODEL=]S]...
        [--tokens-per-second R] [--silent-sse-errors]
        [--tokens N] [--token-delay S] [--faults JSON|@FILE] [--ready-file PATH]
        [--exit-with-parent]

``python3 tests/fakeollama ARGS`` (the directory) runs it too, e.g. copied alone elsewhere.
``--port 0`` picks a free port; ``--ready-file`` receives the port once listening.

Control endpoints (not Ollama's; never faulted):
    GET    /_fake/requests[?path=&state=]  log of model-endpoint and unknown-path requests
           (last 10,000): {id, path, method, headers, body, model, state, status,
           chunks_sent, started, finished, admitted_seq, finished_seq}; state is
           running|completed|cancelled|failed; *_seq order slot grants and ends
    DELETE /_fake/requests                 clear the log
    GET    /_fake/faults, POST /_fake/faults  show / REPLACE the fault set
    GET    /_fake/stats                    request counts per path (all endpoints),
                                           running requests, loaded models, requests
                                           waiting for a slot, running per model,
                                           max_loaded, resident [{model, size, size_vram,
                                           context_length, expires, busy}], loads,
                                           evictions, unloads, expirations,
                                           loads_by_model, evictions_by_model

Fault keys (all optional; "model" faults follow Ollama-style names, ``x`` = ``x:latest``):
    oom_models [names]   500 with oom_text (default: model requires more system memory ...)
    missing_models [names]  404 and hidden from tags/ps/v1 models (a pull un-hides one)
    driver_error bool    500 "llama runner process has terminated: error:failed to
                         create context with model '...'" (driver_text overrides)
    busy bool            503 "server busy, please try again.  maximum pending requests exceeded"
    hang bool            read requests, answer nothing (control endpoints excepted);
                         hung requests resume when the fault is lifted
    hang_generation bool only chat/generate/embed/embeddings/v1 hang; probes answer
    load_delay s         wait before the first byte (before OOM/driver errors too)
    token_delay s        between streamed chunks (overrides --token-delay); a
                         non-streaming reply waits as long as the stream would take
    die_after_chunks N   abort the TCP connection after N chunks (no final chunk;
                         non-streaming: abort without any response)
    error_after_chunks N after N chunks write {"error": error_text} and end (/v1 chat and
                         completions: an SSE data: {"error": {...}} event; /v1/messages:
                         event: error in Anthropic's shape; /v1/responses: a
                         response.failed event; with --silent-sse-errors those two
                         just end, as Ollama's converters drop the error; non-streaming: 500)
    error_text str       default "an error was encountered while running the model:
                         CUDA error: out of memory"
    garbage kind         nonjson | truncated | html | wrong_ctype | error200
    status {code, error} answer every model endpoint with that status
    pull_total int       bytes of the big layer in /api/pull progress (default 1e6)
    pull_error str       /api/pull fails with {"error": pull_error} after the manifest
    only_models [names]  restrict the model-independent faults above to these models
Load-time faults (busy, load_delay, oom, driver) and the chunk faults apply to
chat, generate, embed, embeddings, /v1 chat/completions/embeddings, /v1/messages and
/v1/responses, each in its API's error shape (Anthropic: {"type": "error", "error":
{"type": "not_found_error"|"overloaded_error"|..., "message"}}); status and garbage
also to /api/show; hang to everything but /_fake.

Importable: :func:`build_app` returns an :class:`aiohttp.web.Application` for
in-process tests and :class:`FakeServer` is the state behind it. Needs only the
standard library and aiohttp (3.11 or newer); uses uvloop when importable.
"""

from .faults import Faults
from .models import Arch, embed_vector, normalize_name
from .plumbing import Record
from .process import main, serve
from .server import SERVER_KEY, FakeServer, build_app
from .wire import DEFAULT_MODELS

__all__ = [
    "DEFAULT_MODELS",
    "SERVER_KEY",
    "Arch",
    "FakeServer",
    "Faults",
    "Record",
    "build_app",
    "embed_vector",
    "main",
    "normalize_name",
    "serve",
]
