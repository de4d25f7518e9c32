"""Every numerical tolerance the suite uses, in one place (fp32 on CPU unless the name says otherwise)."""

# Encoder vs birder, fp32. A throwaway port measured 5e-6 to 9e-6: birder's own fp32-vs-fp64 floor.
EMBEDDING_ATOL = 2e-5
TOKENS_ATOL = 2e-5  # every token of forward_features (after the final norm)
# detection_features are pre-norm residual-stream values (tens to hundreds): relative to their magnitude
DETECTION_RTOL_OF_MAX = 1e-5
POS_EMBED_ATOL = 1e-6  # the resampled position embedding itself
# beyond fp32's conditioning: our distance to birder-in-float64 may be at most this times birder-fp32's own
ILL_CONDITIONED_FLOOR_FACTOR = 2.0

# MAE pre-training vs birder's MAE_ViT (tests/test_mae_parity.py)
MAE_PRED_ATOL = 1e-4  # decoder predictions
MAE_LOSS_RTOL = 1e-5  # loss, relative
MAE_POS_EMBED_ATOL = 1e-6  # the sin-cos table: float32 sin/cos of the same float32 arguments
MAE_ENCODER_TOKENS_ATOL = 2e-5  # encoder part of an MAE checkpoint through the encoder table
# the sin-cos tables with and without the frequency endpoint differ by at least this (a real difference)
MAE_POS_EMBED_VARIANTS_MIN_DIFF = 1e-2

# The MAE train step vs birder's (torch) step (tests/test_pretraining_step.py)
STEP_GRAD_RTOL_OF_MAX = 1e-4  # accumulated gradients vs torch's, per tensor, relative to its largest entry
STEP_UPDATE_ATOL_OF_LR = 1e-3  # what two AdamW steps moved each parameter, in units of the learning rate ...
STEP_GRAD_FLOOR = 1e-6  # ... where both gradients exceed 100 x AdamW's eps (see test_step_matches_birder)
STEP_LOSS_RTOL = 1e-5
STEP_BF16_LOSS_RTOL = 2e-2  # bf16 matmul inputs vs the fp32 step
STEP_BF16_GRAD_COSINE = 0.99
STEP_DP_GRAD_RTOL_OF_MAX = 1e-5  # 2 devices vs 1 device: the gradient differs by reduction order only
STEP_DP_LOSS_RTOL = 1e-6

# Optimizer, schedule and clipping vs torch (tests/test_pretraining_optimizer.py)
ADAMW_RTOL = 1e-6  # parameters after the step, relative
LR_RTOL = 1e-12  # both sides in float64
LR_ATOL = 1e-18  # the cosine's last value is 0 (torch: ~1e-20 from its recursive form)
CLIP_RTOL = 1e-6

# Training augmentation vs torchvision (tests/test_pretraining_data_stream.py)
AFFINE_EQUAL_FRACTION = 0.9999  # nearest sampling: a rare coordinate lands on a .5 tie rounded differently
CROP_STAT_ATOL = 0.02  # mean area fraction / log aspect of 4000 draws, ours vs torchvision's

# The compiled Embedder vs net.embedding (tests/test_embedder.py)
EMBEDDER_FP32_ATOL = 1e-5  # fp32 jitted vs eager: the same math in another fusion / micro-batch order
EMBEDDER_BF16_MIN_COSINE = 0.999  # bf16 matmul inputs with fp32 accumulation vs the fp32 embedding

# Converted weights vs birder (tests/test_cli_convert.py)
CONVERT_PARITY_ATOL = 2e-5  # our embedding vs birder's, fp32 CPU (birder's own fp32 floor is ~5e-6)
# The demo: the compiled Embedder vs birder on the sample photos, each side with its own preprocessing
DEMO_PARITY_ATOL = 2e-5
# `--verify` is shown to catch a subtly wrong port: this much added to our embedding fails the default bar ...
VERIFY_INJECTED_ERROR = 1e-3
VERIFY_LOOSE_TOLERANCE = 1e-2  # ... and passes a --tolerance this loose

# The pretrain command, two processes vs one (tests/test_pretraining_loop.py): the same batches, gradients
# averaged across processes in another order, so only rounding differs; AdamW normalises each step to about
# lr per parameter, so parameter differences are bounded in units of lr
DP_RUN_LOSS_RTOL = 1e-5
# measured 7.7e-3 after 4 steps (AdamW turns near-zero gradients into ~lr steps)
DP_RUN_PARAM_ATOL_OF_LR = 1e-2

# Exact cosine top-k (vitreg_jax.evaluation.search) vs a float64 numpy reference (tests/test_search*.py,
# tests/test_neighbours.py): fp32 normalisation and dot of D <= 768 entries; measured <= 3e-7 on CPU
SEARCH_SCORE_ATOL = 2e-6

# k-NN and linear-probe evaluation (tests/test_evaluation.py)
# weighted k-NN class scores vs a float64 numpy reference: exp(s / 0.07) turns the float32 cosine's ~1e-6
# error into ~1.5e-5 relative
KNN_SCORE_RTOL = 1e-4
# our linear probe's top-1 accuracy vs scikit-learn's LogisticRegression at the same L2 strength (1 point)
LINEAR_PROBE_ACCURACY_ATOL = 0.01

# The dataset embedder (tests/test_embed_cli.py, tests/test_embed_dataset.py)
EMBED_FP32_ATOL = 1e-5  # rows written by embed vs net.embedding on the same pixels, and between runs
EMBED_FOLDER_VS_TAR_ATOL = 1e-6  # the same images read from a folder and from tar shards (fp32 rounding)
EMBED_BF16_MIN_COSINE = 0.999  # bfloat16 rows vs the float32 model
