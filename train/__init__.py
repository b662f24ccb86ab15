"""Everything that turns configs into a run: config schema, GPT model, data, DeepSpeed engine, loop."""
