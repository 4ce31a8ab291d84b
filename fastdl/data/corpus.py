"""A built-in text corpus that needs no download: the docstrings of a fixed list of standard-library
modules, read with :mod:`inspect` in a fixed order.

For one Python version the text is the same on every machine and every run (about 0.45 MB of
English prose and code examples on CPython 3.11). Another Python version has other docstrings, so
the corpus, and a model trained on it, belong to a Python minor version; ``corpus_info()`` records it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import warnings

# Pure-Python modules with long, prose-like docstrings, present in every CPython 3.9+ build. Order
# is part of the corpus: do not sort or reorder (appending changes the text, as does a new Python).
CORPUS_MODULES = (
    "abc", "argparse", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "glob", "gzip",
    "heapq", "html", "http.client", "inspect", "io", "ipaddress", "itertools", "json", "logging", "math",
    "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "shlex", "shutil",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "unittest", "urllib.parse", "uuid", "warnings", "weakref", "zipfile",
)

# Shorter docstrings are mostly one-line summaries ("Return self.") that repeat across classes.
_MIN_DOC_CHARS = 40


def _docs_of_module(module) -> list[str]:
    """The module's docstring, then its public classes and functions by name, each class followed by
    its public members by name. Only objects defined in the module itself (no re-exports)."""
    docs = [module.__doc__]
    namespace = vars(module)
    for name in sorted(namespace):
        obj = namespace[name]
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        docs.append(obj.__doc__)
        if inspect.isclass(obj):
            members = vars(obj)
            docs.extend(getattr(members[attr], "__doc__", None) for attr in sorted(members)
                        if not attr.startswith("_") and callable(members[attr]))
    return docs


@functools.cache
def builtin_corpus() -> str:
    """The corpus text: distinct docstrings separated by blank lines, ASCII only (a stable vocabulary of
    at most 97 characters; the few non-ASCII characters in docstrings are dropped)."""
    seen: set[str] = set()
    parts: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. deprecated aliases that warn when their doc is read
        for module_name in CORPUS_MODULES:
            try:
                module = importlib.import_module(module_name)
            except ImportError:  # a stripped-down Python; the corpus is then smaller but still fixed
                continue
            for doc in _docs_of_module(module):
                if not isinstance(doc, str):
                    continue
                text = inspect.cleandoc(doc).encode("ascii", "ignore").decode("ascii")
                if len(text) >= _MIN_DOC_CHARS and text not in seen:
                    seen.add(text)
                    parts.append(text)
    return "\n\n".join(parts) + "\n"


def corpus_info() -> dict:
    """What the built-in corpus was made from: enough to tell whether two runs saw the same text."""
    text = builtin_corpus()
    return {"source": "python-stdlib-docstrings", "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "modules": len(CORPUS_MODULES), "chars": len(text)}
