"""Smoke check of the installed llama-cpp-python: load a tiny synthetic model with llama.cpp's
defaults (weight repacking on) and generate two tokens. Exit 0 when it works.

A llama.cpp built with -march=native on a virtual machine that advertises CPU features its
hypervisor does not enable (seen: Intel AMX) dies with SIGILL on the first repacked matmul;
.ci/setup then rebuilds it without them.
"""

import sys
import tempfile
from pathlib import Path

import llama_cpp

from agent.models.synth import synth_model

with tempfile.TemporaryDirectory() as d:
    model = synth_model("tiny", Path(d) / "tiny.gguf")
    llm = llama_cpp.Llama(str(model), n_ctx=256, n_threads=1, verbose=False)
    llm("Hi", max_tokens=2)
    llm.close()
sys.exit(0)
