"""Training engines: one protocol (`protocol.TrainEngine`), two regimes.

- `deepspeed_zero`: DeepSpeed ZeRO around the whole model (`parallel.regime=zero3`), its config
  merged in `deepspeed_config` from the presets in calm_dist/ds_configs/;
- `megatron_3d`: megatron-core tensor/pipeline parallelism with megatron-core's DDP, gradient
  finalisation and clipping, ZeRO-1 over data parallelism (`parallel.regime=3d`);
- `optimizer`: the one optimizer and LR-schedule builder both use;
- `model_build`, `initial_weights`: the model an engine trains, and its starting weights.

`build.build_engine` picks the regime's engine. This file imports nothing, so that reading the
DeepSpeed config (`calm-train` validates it first) does not import megatron-core.
"""
