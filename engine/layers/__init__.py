"""Generic layers the DeepSeek model is built from, one job per module: linear (plain, FP8-kept, int8/int4
packed), RMSNorm, the token embedding, rotary embedding with YaRN, the SwiGLU MLP, and how a weight loads.

The model-specific blocks sit beside this package: engine/mla.py (attention), engine/moe.py (DeepSeekMoE),
engine/model.py (the topology). Nothing is imported here, so that importing one layer loads only that layer.
"""
