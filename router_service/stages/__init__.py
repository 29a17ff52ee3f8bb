"""The stages of a MoE layer and the model around them, as plain code on tensors (no Ray):
gating (route), placement and EPLB, plan and combine, load statistics, the dispatcher module that
replaces each MoE block, and the router's dense `transformers` model."""
