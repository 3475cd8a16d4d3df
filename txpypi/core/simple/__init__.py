"""
The Simple Repository API (PEP 503 HTML, PEP 691 JSON), pure: no I/O, no
reactor.  One module per concern:

  - L{txpypi.core.simple.model}: the values (L{DistFile}, L{ProjectPage}),
    api-versions, the versions a page lists.
  - L{txpypi.core.simple.media}: the media types and content negotiation.
  - L{txpypi.core.simple.links}: links in a page: upstream ones resolved,
    the ones we serve.
  - L{txpypi.core.simple.pagehtml}, L{txpypi.core.simple.pagejson}: one
    project's page, read and written in HTML and in JSON.
  - L{txpypi.core.simple.projects}: the compact list of all projects.
  - L{txpypi.core.simple.listhtml}, L{txpypi.core.simple.listjson}: the
    root page (that list), read and written in HTML and in JSON.
  - L{txpypi.core.simple.formats}: which of those a content type picks, and
    the form a page is stored in.
"""
