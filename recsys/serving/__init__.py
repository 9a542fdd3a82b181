"""Serving: the model registry (BentoML model store), M-FALCON scoring for HSTU, the BentoML recommendation
service, its impressions log and the offline bento build.

Modules: ``registry`` (register / verify / load models), ``mfalcon`` (HSTU candidate scoring with cached
keys/values), ``schemas`` (request/response models), ``service`` (``Recommender`` engine and the
``RecommendationService`` BentoML class), ``impressions`` (spool + warehouse publish), ``build`` (bento build
helper and the ``serving`` CLI sub-app).
"""
