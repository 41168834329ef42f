"""The source side: libvirt snapshots, changed extents from dirty bitmaps, and reading extents."""
