"""Executor floor: step inputs, the model runner, CUDA graphs, the sampler, models, layers, weight loading
and parallel state: everything that touches the device.
May import: `inflight.kernels` and batching's step plan (`SchedulerOutput`); never the engine or serving."""
