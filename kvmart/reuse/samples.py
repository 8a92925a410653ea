"""Documents shipped in the package (permissively licensed licence texts), for the demo, tests and benchmarks."""

from __future__ import annotations

from importlib import resources

from kvmart.errors import InputError

# name -> (file, a question about it, a word the correct answer contains). mpl-2.0 (3,712 SmolLM2 tokens) is the
# demo's default; the questions are ones SmolLM2-135M-Instruct answers correctly from the cached document.
SAMPLES = {
    "mpl-2.0": ("mpl-2.0.txt", "Who is the license steward?", "Mozilla"),
    "apache-2.0": ("apache-2.0.txt", "What is the name of this license?", "Apache"),
    "gpl-3.0": ("gpl-3.0.txt", "Which organization published this license?", "Free Software Foundation"),
    "bsd-3-clause": ("bsd-3-clause.txt", "Who holds the copyright?", "Regents"),
}


def sample_text(name: str) -> str:
    if name not in SAMPLES:
        raise InputError(f"unknown sample {name!r}; samples are: {', '.join(SAMPLES)}")
    return (resources.files("kvmart") / "data" / "documents" / SAMPLES[name][0]).read_text(encoding="utf-8")
