# Two commands a new user needs: `make demo` (the whole pipeline on the embedded phantom) and `make test`.
# Both create .venv with Python 3.11+ and install requirements.txt on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.requirements-installed

.PHONY: demo test test-slow bench bench-quality bench-quality-gpu gpu-check evidence clean-demo help

help:
	@echo "make demo       run every phase on a generated phantom at 64 px (CPU, minutes)"
	@echo "make test       the fast CPU test suite"
	@echo "make test-slow  also the slow end-to-end tests"
	@echo "make bench      performance benchmarks against peers (bench/)"
	@echo "make bench-quality  time to realism: generator recipes on BUS-BRA at 64 px (BUSBRA=/path; hours)"
	@echo "make bench-quality-gpu  the same at 128 px on a CUDA GPU, wall-clock minutes (BUSBRA=/path; ~10 min)"
	@echo "make gpu-check  every phase at 256 px in bf16 on a CUDA GPU, a few minutes (bench/gpu_check.json)"
	@echo "make evidence   the whole recipe on BUS-BRA (BUSBRA=/path), results in results/busbra_v2/ (CPU: many hours)"

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m ""

# ---------------------------------------------------------------------------------------------- the demo
# Every phase on a generated phantom at 64 px, each a plain command (README "The demo"). Rerunning resumes:
# finished phases are recognised and skipped (training and generation resume, the rest is quick).
DEMO      ?= data/demo
DEMO_RUNS ?= checkpoints/demo
demo: $(STAMP)
	$(PY) prepare_busi_dataset.py --phantom 400 --img_size 64 --output_dir $(DEMO)/phantom64
	$(PY) train_medsegdiff.py --config configs/demo.yaml --data_dir $(DEMO)/phantom64 --output_dir $(DEMO_RUNS)/medsegdiff
	$(PY) generate_synthetic.py --checkpoint_path $(DEMO_RUNS)/medsegdiff/best_model.pth \
	    --balance_to $(DEMO)/phantom64 --total 400 --output_dir $(DEMO)/synthetic
	$(PY) create_combined_dataset.py --real_data $(DEMO)/phantom64 --synthetic_data $(DEMO)/synthetic \
	    --output_dir $(DEMO)/combined
	$(PY) train_segmentation.py --config configs/demo_segmentation.yaml --data_dir $(DEMO)/phantom64 \
	    --output_dir $(DEMO_RUNS)/seg_real
	$(PY) train_segmentation.py --config configs/demo_segmentation.yaml --data_dir $(DEMO)/combined \
	    --output_dir $(DEMO_RUNS)/seg_combined
	$(PY) evaluate.py --real_data $(DEMO)/phantom64 --synthetic_data $(DEMO)/synthetic \
	    --baseline_run $(DEMO_RUNS)/seg_real --combined_run $(DEMO_RUNS)/seg_combined --output_dir $(DEMO_RUNS)/report
	@echo "demo report: $(DEMO_RUNS)/report/report.html"

# ---------------------------------------------------------------------------------------------- benchmarks
# Ratios against peers measured in the same run; writes bench/results.json (docs/benchmarks.md).
bench: $(STAMP)
	$(PY) bench/run.py

# Time to realism (bench/quality.py): each recipe trains side by side on a CPU-minute budget, then KID beside the
# real-vs-real floor at N=500. The recipes, budgets and phases are flags; see python bench/quality.py --help.
QUALITY_RECIPES ?= current,peer
QUALITY_BUDGETS ?= 15,30,60
bench-quality: $(STAMP)
	@test -n "$(BUSBRA)" -o -f data/quality/busbra64/dataset.json || { echo "make bench-quality needs BUSBRA=/path/to/BUSBRA"; exit 2; }
	$(PY) bench/quality.py $(if $(BUSBRA),--input_dir $(BUSBRA)) --recipes $(QUALITY_RECIPES) --budgets $(QUALITY_BUDGETS)

bench-quality-gpu: $(STAMP)
	@test -n "$(BUSBRA)" -o -f data/quality/busbra128/dataset.json || { echo "make bench-quality-gpu needs BUSBRA=/path/to/BUSBRA"; exit 2; }
	$(PY) bench/quality.py --device cuda --img_size 128 --data_dir data/quality/busbra128 $(if $(BUSBRA),--input_dir $(BUSBRA)) \
		--work_dir checkpoints/quality128 --recipes current,current_seed1,attn_none,peer --budgets 1,2.5 --jobs 4 \
		--winner current --headline_budget 2.5 --output bench/quality_gpu128.json

gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py

# ---------------------------------------------------------------------------------------------- evidence
# The whole recipe on BUS-BRA (make evidence BUSBRA=/path/to/BUSBRA, the folder of the Zenodo download): arms x 3
# seeds, the answer in results/busbra_v2/ (docs/evidence.md). Many hours on 2 CPU cores.
BUSBRA ?=
evidence: $(STAMP)
	@test -n "$(BUSBRA)" || { echo "make evidence needs BUSBRA=/path/to/BUSBRA (the BUS-BRA download)"; exit 2; }
	$(PY) bench/evidence.py --input_dir $(BUSBRA)

clean-demo:
	rm -rf $(DEMO) $(DEMO_RUNS)
