//! placeholder: the admission webhook (issue 5)
