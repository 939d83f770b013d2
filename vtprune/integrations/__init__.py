"""Plug-ins for other tools: lmms-eval (``lmms_eval``, optional extra ``vtprune[lmms-eval]``) and vLLM (``vllm``,
``vllm_llava``, ``vllm_bench``; optional extra ``vtprune[vllm]``, in an environment of its own)."""
