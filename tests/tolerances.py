"""Every numerical tolerance the suite uses, in one place (fp32 on CPU unless the name says otherwise)."""

# Encoder vs birder, fp32. A throwaway port measured 5e-6 to 9e-6: birder's own fp32-vs-fp64 floor.
EMBEDDING_ATOL = 2e-5
TOKENS_ATOL = 2e-5  # every token of forward_features (after the final norm)
# detection_features are pre-norm residual-stream values (tens to hundreds): relative to their magnitude
DETECTION_RTOL_OF_MAX = 1e-5
POS_EMBED_ATOL = 1e-6  # the resampled position embedding itself
# beyond fp32's conditioning: our distance to birder-in-float64 may be at most this times birder-fp32's own
ILL_CONDITIONED_FLOOR_FACTOR = 2.0
