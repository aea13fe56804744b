"""Images as files and pictures: decoding with clear errors and bounded size (`io`), thumbnails and grids (`draw`)."""
