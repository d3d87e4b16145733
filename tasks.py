"""The tasks valet can run: plain functions, registered by name in TASKS.

A task is called as fn(metadata), where metadata is the job's JSON payload
(a dict, list, string, number, bool or None). What it returns must be
JSON-serialisable: it becomes the job's result. An exception fails the job
with failure_reason "<ExceptionType>: <message>".

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


TASKS = {
    "dummytask": dummytask,
    "echo": echo,
    "sleep": sleep,
    "fail": fail,
    "add": add,
    "word_count": word_count,
    "sha256": sha256,
}
