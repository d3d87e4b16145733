"""The tasks valet can run: plain functions, registered by name in TASKS.

A task is called as fn(metadata), where metadata is the job's JSON payload
(a dict, list, string, number, bool or None). What it returns must be
JSON-serialisable: it becomes the job's result. An exception fails the job
with failure_reason "<ExceptionType>: <message>".

A task that also takes a keyword argument named `context` is given a
valet.Context: the job id, the attempt number, the deadline, a `cancelled`
Event, and progress(fraction, message) (see countdown below). A pipeline job
with use_previous_results is called as fn(metadata, previous_result).

Point valet at your own module with the config key tasks_module; it needs
only a TASKS dict like the one at the bottom of this file.
"""

import hashlib
import time


def dummytask(metadata):
    """Return the metadata with "url" set, like the original Go valet's dummy task."""
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise TypeError(f"dummytask takes a JSON object, got {type(metadata).__name__}")
    return {**metadata, "url": "http://www.test-url.com"}


def echo(metadata):
    """Return the metadata unchanged."""
    return metadata


def sleep(metadata):
    """Sleep for metadata["seconds"] (default 1), then return how long it slept."""
    seconds = (metadata or {}).get("seconds", 1)
    time.sleep(seconds)
    return {"slept": seconds}


def fail(metadata):
    """Always fail, with metadata["message"] as the reason."""
    raise RuntimeError((metadata or {}).get("message", "this task always fails"))


def add(metadata):
    """Sum a list of numbers: {"numbers": [1, 2, 3]} -> {"sum": 6}."""
    return {"sum": sum(metadata["numbers"])}


def word_count(metadata):
    """Count words: {"text": "a b a"} -> {"words": 3, "counts": {"a": 2, "b": 1}}."""
    words = metadata["text"].split()
    counts = {}
    for word in words:
        counts[word] = counts.get(word, 0) + 1
    return {"words": len(words), "counts": counts}


def sha256(metadata):
    """Hash text: {"text": "abc"} -> {"sha256": "ba78..."}."""
    return {"sha256": hashlib.sha256(metadata["text"].encode("utf-8")).hexdigest()}


def hash_rounds(metadata):
    """Hash {"text": "abc"} {"rounds": 1000} times over (SHA-256 of each digest):
    CPU-bound work that holds the GIL, for trying worker processes."""
    rounds = (metadata or {}).get("rounds", 1000)
    digest = (metadata or {}).get("text", "").encode("utf-8")
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return {"sha256": digest.hex(), "rounds": rounds}


def countdown(metadata, context):
    """Count {"steps": 10} steps of {"delay": 0.5} seconds, reporting progress; stop
    early, saying where, when the job is cancelled or times out."""
    steps = (metadata or {}).get("steps", 10)
    delay = (metadata or {}).get("delay", 0.5)
    for step in range(steps):
        if context.cancelled.wait(delay):
            return {"stopped_at": step}
        context.progress((step + 1) / steps, f"step {step + 1} of {steps}")
    return {"counted": steps, "attempt": context.attempt}


def previous(metadata, previous_result=None):
    """Return what the job before this one in a pipeline returned (use it with
    use_previous_results: true)."""
    return previous_result


TASKS = {
    "dummytask": dummytask,
    "echo": echo,
    "sleep": sleep,
    "fail": fail,
    "add": add,
    "word_count": word_count,
    "sha256": sha256,
    "hash_rounds": hash_rounds,
    "countdown": countdown,
    "previous": previous,
}
