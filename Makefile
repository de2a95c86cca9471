# xtpath: the two set-up commands of README.md.
#   make demo   installs into .venv and runs the pipeline on bundled data (offline)
#   make test   installs into .venv (with test extras) and runs the test suite
# Override TORCH to choose another PyTorch build, e.g. make test TORCH="torch torchvision".

VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
export HF_HUB_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test install clean

$(VENV)/.installed-base: pyproject.toml
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4/1048576)}'); \
	  if [ "$$free" -lt 9 ]; then echo "make: warning: only $$free GB free on $$(df -P . | awk 'NR==2 {print $$6}');" \
	  "the install needs about 9 GB (the pinned PyTorch is a 5.5 GB CUDA build): free space or pass a smaller" \
	  "build, e.g. TORCH=\"torch torchvision --index-url https://download.pytorch.org/whl/cpu\"" >&2; fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-base
	$(PY) -m pip install -q -e ".[test,napari,workflows]"
	$(PY) -m pip install -q -e plugins/napari_xt
	touch $@

install: $(VENV)/.installed-base

demo: $(VENV)/.installed-base
	$(VENV)/bin/xtpath demo --out demo_out

test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache .hypothesis
