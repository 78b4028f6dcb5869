"""Open-Llama: evaluation of a model, offline: downstream tasks from OLMo's request files (tasks), their
log-likelihoods (loglikelihood) and figures (metrics), bits per byte of held-out text per source (text_bpb),
the tokenizer of a model folder (encoding), a whole evaluation with its outputs (evaluator), and the 13-gram overlap of task documents with training
shards (decontaminate)."""
