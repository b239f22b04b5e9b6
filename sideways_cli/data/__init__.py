"""Videos in: decoding, datasets (the embedded synthetic one, UCF101, HMDB51, lists, folders),
downloading, indexing, sampling and transforms."""
