"""How the model is spread over processes and devices: process groups, DeepSpeed, (later) EP and FP8."""
