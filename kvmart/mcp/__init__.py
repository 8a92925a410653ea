"""`kvmart mcp`: a Model Context Protocol server (the official `mcp` SDK; stdio or streamable HTTP) that lets agents
find hosted KV caches and read them: search the catalogue, read a document's card, ask about documents, check the
balance and the receipts. It is a client of a `kvmart serve` node's HTTP API (or of `kvmart route`), so every
question is metered to the caller's API key exactly as a direct API call is: no path of its own into the ledger.

    client.py   the HTTP API, as the tools call it (typed errors carrying the server's message)
    tools.py    the tools: what they send, and the results they give back
    server.py   the MCP server over the tools, and its transports"""
