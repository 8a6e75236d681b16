"""Error classification against Ollama's real error texts (see shared/ollama-api-notes.md)."""

from __future__ import annotations

import pytest

from harbord.classify import classify, error_text

CASES = [
    # status, text, class
    (404, "model 'llama3:latest' not found", "model"),
    (404, 'model "llama3" not found, try pulling it first', "model"),
    (500, "model requires more system memory (10.9 GiB) than is available (7.6 GiB)", "oom"),
    (500, "llama runner process has terminated: CUDA error: out of memory", "oom"),
    (500, "llama runner process has terminated: cudaMalloc failed: out of memory", "oom"),
    (
        500,
        "llama runner process has terminated: error loading model: unable to allocate CUDA0 buffer",
        "oom",
    ),
    (
        500,
        "llama runner process has terminated: error loading model: unable to allocate "
        "CUDA_Host buffer",
        "oom",
    ),
    (500, "llama-server reported out-of-memory during startup: failed to fit", "oom"),
    (200, "an error was encountered while running the model: CUDA error: out of memory", "oom"),
    (500, "insufficient memory to load model", "oom"),
    (500, "not enough VRAM available", "oom"),
    (500, "llama runner process has terminated: exit status 2", "driver"),
    (500, "llama runner process has terminated: signal: aborted (core dumped)", "driver"),
    (500, "llama runner process has terminated: error:fault", "driver"),
    (
        500,
        "llama runner process has terminated: error:failed to create context with model "
        "'/models/blobs/sha256-x'",
        "driver",
    ),
    (
        500,
        "model runner has unexpectedly stopped, this may be due to resource limitations or an "
        "internal error, check ollama server logs for details",
        "driver",
    ),
    (500, "ggml_vulkan: device lost", "driver"),
    (500, "HIP error: invalid device function", "driver"),
    (500, "ROCm initialisation failed", "driver"),
    (503, "server busy, please try again.  maximum pending requests exceeded", "busy"),
    (503, "", "busy"),
    (400, "missing request body", "client"),
    (400, "invalid character 'x' looking for beginning of value", "client"),
    (400, "model is required", "client"),
    (400, '"nomic-embed-text" does not support chat', "client"),
    (500, "invalid file format", "model"),
    (500, "the model file is corrupt", "model"),
    (502, "<html><body><h1>502 Bad Gateway</h1></body></html>", "network"),
    (500, "something else went wrong", "other"),
    # Words on boundaries: none of these is what it looks like.
    (500, "the chip overheated", "other"),  # chip is not hip
    (500, "no room left in the queue", "other"),  # room is not oom
    (500, "dial tcp: lookup cuda-box.lan: no such host", "other"),  # a host name
    (500, "connection to vulkan.example.org failed", "other"),
    (500, "rocm-node-3 unreachable", "other"),
    (500, "shipment delayed", "other"),  # hip inside a word
]


@pytest.mark.parametrize(("status", "text", "expected"), CASES, ids=[c[1][:40] for c in CASES])
def test_classify(status: int, text: str, expected: str) -> None:
    assert classify(status, text) == expected


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (b'{"error":"model \'x\' not found"}', "model 'x' not found"),
        (
            b'{"error":{"message":"model \\"x\\" not found","type":"api_error"}}',
            'model "x" not found',
        ),
        (b"<html>Bad Gateway</html>", "<html>Bad Gateway</html>"),
        (b'{"detail": 1}', '{"detail": 1}'),
        (b"", ""),
    ],
)
def test_error_text(body: bytes, text: str) -> None:
    assert error_text(body) == text
