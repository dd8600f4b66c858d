"""The test bed shared by tests/ and bench/: real Debian hosts in network namespaces, a Hub
stand-in, real llama-server, a qemu VM, a real Backstage backend, models. Not shipped."""
