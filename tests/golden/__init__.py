"""Golden data: request bytes captured from Exim 4.96 and spamc, and a model of how Exim parses replies."""
