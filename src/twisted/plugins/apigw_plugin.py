# No __init__.py in twisted/ or twisted/plugins/: this file is found through
# twisted.plugins' search path, and the module string defers importing apigw
# until `twistd apigw` is actually chosen.
from twisted.application.service import ServiceMaker

apigw = ServiceMaker(
    "apigw",
    "apigw.tap",
    "apigw: an event-driven API gateway (routing, keys, rate limits, metrics)",
    "apigw",
)
