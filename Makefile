# pyoptim developer entry points. Every target is idempotent and sets itself up on a fresh machine.
#   make demo        venv + pinned deps + build + Fashion-MNIST, then the main job: a short PruneTrain
#                    run (pyoptim train, about 3 min on 2 CPU cores) compared with the stored dense
#                    run of the same recipe; prints both, and where its report and picture are
#   make demo-dense  the dense run of the demo's recipe, stored as the demo's reference
#   make test        venv + pinned deps + build, then the whole test suite; every Triton launch it
#                    makes (interpreted) is then compiled for sm_90 without a GPU (aot_check)
#   make cuda-check  compile every csrc/cuda/*.cu with nvcc (compile only; no GPU needed)
#   make bench       the kernel benchmark scripts, results in bench/results/
#   make bench-prunetrain  dense vs PruneTrain (short lasso with a floor) on Fashion-MNIST, 15 000
#                          steps a run, 3 seeds, and a uniform width 0.75 (7 runs of 9-14 min, one thread)
#   make bench-prunetrain-tv  torchvision's MobileNetV3-Small (tv:mobilenet_v3_small) on Fashion-MNIST,
#                          dense then PruneTrain, 10 epochs of 10 000 images (about 6 min, one thread)
#   make bench-scheme-search  sparse update: pretrain MobileNetV2-w0.35 (cached), contribution tables
#                          of few_shot and shift (8 ratio levels, 2 seeds; about 40 min on 2 cores,
#                          resumable), then evolution vs random search vs the optimum and the
#                          fine-tuned check (about 15 min)
#   make bench-budget      budgeted training on Fashion-MNIST, every knob at 1/2..1/20 of the full
#                          run's time (about 40 min on 2 CPU cores)

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
# torchvision's classification models (pyoptim train --model tv:NAME): the release matching TORCH,
# installed with --no-deps (its wheel requires a CUDA torch: pip would replace the CPU one); its
# other requirements, numpy and pillow (through matplotlib), come with requirements/dev.txt
TORCHVISION ?= torchvision==0.28.0
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

SOURCES := $(shell find csrc triton_kernels pyoptim -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null) CMakeLists.txt pyproject.toml

# Fashion-MNIST: Debian's dataset-fashion-mnist (the only source these machines can reach);
# PYOPTIM_DATA=<folder of the IDX files> uses another copy instead.
FASHION_MNIST := /usr/share/datasets/fashion-mnist
# the demo's recipe, shared by its PruneTrain run and the dense run it is compared with
DEMO_RECIPE ?= --model resnet20 --data fashion-mnist --epochs 8 --train-subset 20000 --batch-size 64 \
               --lr 0.1 --schedule step --precise-bn 20 --seed 0
DEMO_DENSE  ?= bench/results/demo_dense_cpu.json
DEMO_ARGS   ?= $(DEMO_RECIPE) --method prunetrain --lpr 0.7 --bn-scale --round-to 16 --threshold 0.4 --min-keep 0.5 \
               --lasso-steps 400 --interval 200 --interval-unit step --max-batch-size 512 --out runs/demo \
               --compare-to $(DEMO_DENSE)

.PHONY: demo demo-dense test cuda-check bench bench-prunetrain bench-prunetrain-tv bench-scheme-search bench-budget install clean fashion-mnist

demo: $(VENV)/.built fashion-mnist
	PYOPTIM_QUIET=1 $(VENV)/bin/pyoptim train $(DEMO_ARGS)

# the dense run of the demo's recipe, stored for the demo's comparison (about 3 min on 2 CPU cores)
demo-dense: $(VENV)/.built fashion-mnist
	PYOPTIM_QUIET=1 $(VENV)/bin/pyoptim train $(DEMO_RECIPE) --method dense --out runs/demo-dense
	cp runs/demo-dense/report.json $(DEMO_DENSE)

fashion-mnist:
	@if [ -n "$$PYOPTIM_DATA" ] || [ -d "$(FASHION_MNIST)" ]; then exit 0; fi; \
	echo "Fashion-MNIST is not in $(FASHION_MNIST): installing Debian's dataset-fashion-mnist"; \
	SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	$$SUDO apt-get install -y dataset-fashion-mnist || \
	  { $$SUDO apt-get update && $$SUDO apt-get install -y dataset-fashion-mnist; } || \
	  { echo "could not install dataset-fashion-mnist: install it (apt-get, root) or set PYOPTIM_DATA"; exit 1; }

LAUNCHES := $(CURDIR)/$(VENV)/triton_launches.json

test: $(VENV)/.built
	rm -f $(LAUNCHES)
	TRITON_INTERPRET=1 PYOPTIM_QUIET=1 PYOPTIM_TRITON_LAUNCHES=$(LAUNCHES) $(VENV)/bin/pytest -q
	cd / && env -u TRITON_INTERPRET PYOPTIM_QUIET=1 $(CURDIR)/$(PY) -m pyoptim.triton_kernels.aot_check $(LAUNCHES)

cuda-check: $(VENV)/.deps
	PY=$(PY) bash tools/check_cuda_compile.sh

bench: $(VENV)/.built
	PYOPTIM_QUIET=1 $(PY) bench/bench_group_lasso.py
	PYOPTIM_QUIET=1 $(PY) bench/bench_sparse_update.py
	PYOPTIM_QUIET=1 $(PY) bench/bench_channel_union.py

# the 3-seed result in docs/benchmarks.md: the short lasso with a floor against dense and a uniform width 0.75
PRUNE_MAIN ?= --bn-scale --round-to 16 --interval 500 --interval-unit step --min-keep 0.5 --lpr 0.7 \
              --lasso-steps 750 --threshold 0.4
bench-prunetrain: $(VENV)/.built fashion-mnist
	PYOPTIM_QUIET=1 OMP_NUM_THREADS=1 $(PY) bench/bench_prunetrain.py --seeds 0 1 2 --main b750 \
	  --variant "b750=$(PRUNE_MAIN)" --dense-variant "w0.75=--width 0.75" --name prunetrain_resnet20_15k_shortlasso

# torchvision's MobileNetV3-Small (random init, the grey image repeated on 3 channels, a 10-class
# head) on 10 000 Fashion-MNIST images, 10 epochs: the dense run, then PruneTrain compared with it
# (about 3 + 3 min, one thread); reports in bench/results/prunetrain_tv_mobilenet_v3_small*_cpu.*
TV_RECIPE ?= --model tv:mobilenet_v3_small --data fashion-mnist --epochs 10 --train-subset 10000 --batch-size 64 \
             --lr 0.1 --schedule step --precise-bn 20 --seed 0
TV_PRUNE  ?= --method prunetrain --lpr 0.95 --bn-scale --round-to 8 --threshold 0.4 --min-keep 0.5 \
             --lasso-steps 400 --interval 100 --interval-unit step --no-grow-batch
TV_RESULT := bench/results/prunetrain_tv_mobilenet_v3_small
bench-prunetrain-tv: $(VENV)/.built fashion-mnist
	PYOPTIM_QUIET=1 OMP_NUM_THREADS=1 $(VENV)/bin/pyoptim train $(TV_RECIPE) --method dense --out runs/tv-mbv3s-dense
	cp runs/tv-mbv3s-dense/report.json $(TV_RESULT)_dense_cpu.json
	cp runs/tv-mbv3s-dense/report.png $(TV_RESULT)_dense_cpu.png
	PYOPTIM_QUIET=1 OMP_NUM_THREADS=1 $(VENV)/bin/pyoptim train $(TV_RECIPE) $(TV_PRUNE) \
	  --compare-to $(TV_RESULT)_dense_cpu.json --out runs/tv-mbv3s-prunetrain
	cp runs/tv-mbv3s-prunetrain/report.json $(TV_RESULT)_cpu.json
	cp runs/tv-mbv3s-prunetrain/report.png $(TV_RESULT)_cpu.png

SEARCH_RATIOS ?= 0.125,0.25,0.375,0.5,0.625,0.75,0.875,1
SEARCH_TASKS  ?= few_shot shift
SEARCH_BUDGETS ?= 0.1,0.2,0.3,0.5
bench-scheme-search: $(VENV)/.built fashion-mnist
	PYOPTIM_QUIET=1 $(PY) bench/make_pretrained.py --threads 1
	for t in $(SEARCH_TASKS); do PYOPTIM_QUIET=1 $(PY) bench/contribution_tables.py --task $$t --window 16 \
	  --ratios $(SEARCH_RATIOS) --seeds 0,1 --workers 2 --cache runs/contribution_$$t.json \
	  --out runs/tables_$$t.json || exit 1; done
	PYOPTIM_QUIET=1 $(PY) bench/bench_scheme_search.py $(foreach t,$(SEARCH_TASKS),--tables runs/tables_$(t).json) \
	  --budgets $(SEARCH_BUDGETS) --workers 2 --name scheme_search_mbv2

bench-budget: $(VENV)/.built fashion-mnist
	PYOPTIM_QUIET=1 $(PY) bench/bench_budget.py

install: $(VENV)/.built

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: $(VENV)/bin/python requirements/dev.txt Makefile
	$(PIP) install -q "$(TORCH)" -r requirements/dev.txt
	$(PIP) install -q --no-deps "$(TORCHVISION)"
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps .
	touch $@

clean:
	rm -rf build $(VENV)
