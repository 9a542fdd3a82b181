"""Serving: the model registry (BentoML model store), M-FALCON scoring for HSTU, the BentoML recommendation
service, its impressions log and the offline bento build.

Modules: ``registry`` (register / verify / load models), ``ids`` (the dataset's own ids <-> internal ids),
``mfalcon`` (HSTU candidate scoring with cached keys/values), ``schemas`` (request/response models),
``service`` (``Recommender`` engine and the ``RecommendationService`` BentoML class), ``recommender`` (the
batch top-k front door, ``recsys.Recommender``, and ``recsys recommend``), ``impressions`` (spool +
warehouse publish), ``build`` (bento build helper and the ``serving`` CLI sub-app).
"""
