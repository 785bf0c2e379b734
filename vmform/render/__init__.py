"""Rendering desired resources into libvirt XML (built with lxml, so values never become structure),
validated against libvirt's own RNG schemas before anything is sent."""
