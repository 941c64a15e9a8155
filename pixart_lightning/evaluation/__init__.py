"""Images from a trained model, and their scores: the sample generator, FID and the shapes-world alignment."""
