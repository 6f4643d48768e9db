"""Training: the Experiment (jitted init / train step / generation on a mesh), the train loop, optimizer, EMA, sharding, memory and compile reports, metrics and summaries."""
