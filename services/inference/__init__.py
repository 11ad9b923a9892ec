"""Inference service: generation on vLLM, TensorRT-LLM or the small in-process model."""
