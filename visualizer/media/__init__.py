"""A run as files and images: GIF / MP4 / WebP / ZIP exports, sampler grids, views of one step, word-map films."""
