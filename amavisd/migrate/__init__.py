"""`amavisd import-config`: an amavisd-new configuration, read and translated.

amavisd-new is configured in Perl; a site moving to amavisd has a
`conf.d` of assignments. This package reads them without running Perl
(`lexer` -> `parser` -> `evaluate`, with `builtins` for the few calls a
configuration makes) and translates the settings amavisd has (`translate`,
one row a variable), printing TOML that amavisd's own loader accepts, with
a `# not translated:` line, naming file and line, for everything else.

It must never execute anything from the files it reads, never fail with a
traceback on a hostile file, and never carry over a setting that would
make amavisd pass mail it has not checked.
"""
