"""The HTTP routes, one router per concern; each handler gets the served gallery's
:class:`~galleria.service.context.ServiceContext` injected (``Depends(service)``)."""
