"""What every API shares: settings, the bound native server with its event
loop plumbing, the socket bridge, addresses and Unix sockets, serving until a
signal, and the server's loggers."""
