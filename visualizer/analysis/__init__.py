"""Reading a run: convergence metrics, plots, the pipeline's stages, guidance and forward noising, word maps, image space."""
