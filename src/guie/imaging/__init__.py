"""Images as files and pictures: decoding with clear errors and bounded size (`io`), the one resize geometry from
any image to model input (`geometry`), thumbnails and grids (`draw`)."""
