"""Serving floor: the Triton model, the vLLM / TensorRT-LLM input and output conventions, the engine and
response threads, metrics, fault injection. It knows Triton (numpy tensors), never torch.
May import: the engine floor (and batching's types); nothing imports it but the model repository."""
