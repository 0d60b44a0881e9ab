"""Generation: the library behind sample_guided.py. A pipeline (score model, classifier, guides,
label map) is loaded from typed arguments; sampling options select a sampler and guidance terms;
batches are drawn with one random generator per sample and written by a resumable npz writer."""
