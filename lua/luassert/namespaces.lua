-- One registry per runtime of the names luassert understands: assertions,
-- modifiers (is/not/...) and matchers. Shared by assert and match.
return { assertion = {}, modifier = {}, matcher = {} }
