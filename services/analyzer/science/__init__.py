"""Pure numerics of the analyses (arrays in, numbers out; no bus, no file I/O except the frame
band reader of :mod:`.stacking`): robust statistics, preprocessing, smooth 2-D surfaces, fitting,
stacking, thumbnails. Families import from here; families never import each other."""
