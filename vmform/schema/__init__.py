"""One declaration per managed field: what a manifest may say, where it lives in libvirt's XML,
how it is normalised and how a change to it takes effect. The loader, the diff, the renderer,
import and docs/MANIFEST.md all read these declarations."""
